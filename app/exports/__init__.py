"""steptune.exports: tuned schedules in the formats generation stacks load."""
