"""sparse_peft: sparse fine-tuning methods for Hugging Face PEFT.

Importing this package registers the methods with PEFT (safe to repeat), so that
`get_peft_model`, `PeftModel.from_pretrained` and `AutoPeftModelForCausalLM` know `SparseConfig`
and adapters saved with it. Import it before loading such an adapter.
"""

from . import pretraining
from ._peft import SparsePeftType, install_load_guard, install_model_card_hook, register
from .card import update_model_card
from .calibration import calibrate
from .callbacks import SparseCallback, install_default_callback
from .config import SparseConfig
from .delta import Delta
from .layer import Conv2d, Linear, SparseLayer
from .methods import METHODS, Method, register_method
from .model import SparseModel, _discard_adapter
from .optim import SparseSM3
from .prune import PruneReport, prune
from .schedule import SparseScheduler, install_optimizer_hooks
from .version import __version__


# the pretraining converter's name before it moved to `pretraining` (sparse_peft.sltrain.convert keeps working)
sltrain = pretraining

register(SparseConfig, SparseModel)
install_model_card_hook(update_model_card)
install_load_guard(_discard_adapter)
install_optimizer_hooks()
install_default_callback()

__all__ = [
    "METHODS",
    "Conv2d",
    "Method",
    "Delta",
    "Linear",
    "SparseCallback",
    "SparseConfig",
    "SparseLayer",
    "SparseModel",
    "SparsePeftType",
    "PruneReport",
    "SparseSM3",
    "SparseScheduler",
    "__version__",
    "calibrate",
    "pretraining",
    "prune",
    "register_method",
    "sltrain",
]
