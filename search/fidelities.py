"""The two fidelities of a search: candidates are ranked on the cheap one (a prefix of the train bank) and
the best few confirmed on the held-out bank, on which every result is reported. Their values are the
evaluator's bank names."""

CHEAP = "train"
CONFIRM = "heldout"
