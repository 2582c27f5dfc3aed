"""Recovery by distillation: fake-quant training of a compressed model against its dense teacher.

fakequant  FakeQuantLinear: latent weights, fixed sparsity mask, learnable scales on the kernels' grids
           (straight-through rounding); export() gives back the deployable QuantLinear / Sparse24Linear
diffq      DiffQuantLinear: learnable non-uniform int4 levels per group (Polino et al.), re-fitted to the
           uniform grid on export
losses     pure distillation losses: logit KL with temperature, per-layer hidden MSE / cosine, the mix
train      RecoverConfig and recover(): local (per decoder layer) then global (end to end) distillation,
           with checkpoints that resume
"""

from llmcompress.recover.diffq import DiffQuantLinear
from llmcompress.recover.fakequant import FakeQuantLinear, round_ste, sparse24_keep, to_fake_quant
from llmcompress.recover.losses import distill_loss, hidden_cosine, hidden_loss, hidden_mse, kl_logits
from llmcompress.recover.train import (
    RecoverConfig,
    check_recoverable,
    export_all,
    logit_kl,
    make_trainable,
    recover,
    to_trainable,
)

__all__ = [
    "DiffQuantLinear", "FakeQuantLinear", "RecoverConfig", "check_recoverable", "distill_loss", "export_all",
    "hidden_cosine", "hidden_loss", "hidden_mse", "kl_logits", "logit_kl", "make_trainable", "recover",
    "round_ste", "sparse24_keep", "to_fake_quant", "to_trainable",
]
