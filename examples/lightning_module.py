"""Relevance finetuning as a Lightning module (docs/integrations.md#lightning).

    trainer = L.Trainer(max_epochs=50, inference_mode=False)   # validation needs gradients
    trainer.fit(RelevanceFinetune("vit_base_patch16_224.augreg_in21k_ft_in1k"), train_loader, val_loader)
    save_finetuned(module.model, "exported/vit_base")

The loaders yield ``(images (B, 3, H, W), masks (B, 1, H, W) in [0, 1], labels (B,))``, e.g.
``relevance_finetune.data.MaskedImageFolder`` with ``paired_transforms(model)``. The GAE handle is
attached to the bare timm model in ``__init__``, before Lightning moves or wraps anything.
"""
from __future__ import annotations

from typing import Any

import lightning as L
import timm
import torch

from relevance_finetune import RelevanceRegularizer, attach_gae

__all__ = ["RelevanceFinetune"]


class RelevanceFinetune(L.LightningModule):
    """A timm model, its GAE handle and the paper's loss, with the paper's optimiser and schedule.

    Parameters
    ----------
    model_name:
        Any ``timm.create_model`` name (``local-dir:DIR``, ``hf-hub:ORG/NAME`` included).
    pretrained:
        Load the name's pretrained weights.
    lr, weight_decay, lr_decay, lr_decay_epochs:
        AdamW, and ``lr * lr_decay ** (epoch // lr_decay_epochs)`` (the paper: 0.85 every 2 epochs).
    model_kwargs:
        More ``timm.create_model`` arguments (``num_classes``, ``img_size``, ...).
    loss_kwargs:
        ``RelevanceRegularizer`` settings (``lambda_bg``, ``classification``, ...; default: the paper's).
    """

    def __init__(
            self,
            model_name: str,
            pretrained: bool = True,
            lr: float = 3e-6,
            weight_decay: float = 1e-4,
            lr_decay: float = 0.85,
            lr_decay_epochs: int = 2,
            model_kwargs: dict[str, Any] | None = None,
            loss_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = timm.create_model(model_name, pretrained=pretrained, **(model_kwargs or {}))
        self.gae = attach_gae(self.model)  # the bare model: its own attention modules record
        self.criterion = RelevanceRegularizer(self.gae, **(loss_kwargs or {}))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def _step(self, batch: tuple[torch.Tensor, ...], stage: str) -> torch.Tensor:
        images, masks, labels = batch
        out = self.criterion(self.model(images), masks, labels=labels)
        parts = {name: getattr(out, name) for name in ("loss", "background", "foreground", "classification")}
        self.log_dict({f"{stage}/{k}": v.detach() for k, v in parts.items() if v is not None},
                      prog_bar=stage == "val", batch_size=images.shape[0], sync_dist=stage == "val")
        return out.loss

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        with torch.enable_grad():  # Lightning validates under no_grad; relevance needs the attention gradients
            self._step(batch, "val")

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.model.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, hp.lr_decay_epochs, hp.lr_decay)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}
