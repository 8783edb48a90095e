"""k-diffusion's own modules from its PyPI package (k-diffusion 0.1.1.post1, installed by scripts/test.sh without its
dependencies, whose pins conflict with numpy 2). Its package ``__init__`` imports every training and evaluation
module (dctorch, clean-fid, CLIP, scikit-image); ``sampling`` and ``external`` need only torch, scipy, torchsde,
torchdiffeq and tqdm, so they are loaded from the installed package folder without running it. ``k_diffusion.utils``
also imports torchvision for its PIL helpers, which sampling never calls: where torchvision is not installed, a
placeholder stands in for that one import and is removed again."""

import importlib
import importlib.util
import sys
import types


def kdiffusion(name: str):
    """``k_diffusion.<name>`` (``sampling`` or ``external``) from the installed package."""
    if "k_diffusion" not in sys.modules:
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None:
            raise ImportError("k-diffusion is not installed; run scripts/test.sh (pip install --no-deps "
                              "k-diffusion==0.1.1.post1)")
        package = types.ModuleType("k_diffusion")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["k_diffusion"] = package
        _load_utils()
    return importlib.import_module(f"k_diffusion.{name}")


def _load_utils() -> None:
    if importlib.util.find_spec("torchvision") is not None:
        importlib.import_module("k_diffusion.utils")
        return
    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")
    stubs = {n: types.ModuleType(n) for n in names}
    stubs["torchvision"].transforms = stubs["torchvision.transforms"]
    stubs["torchvision.transforms"].functional = stubs["torchvision.transforms.functional"]
    sys.modules.update(stubs)
    try:
        importlib.import_module("k_diffusion.utils")
    finally:
        for n in names:
            sys.modules.pop(n, None)
