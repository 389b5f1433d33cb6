"""The README's drop-in example: relevance finetuning inside your own training loop."""
import timm
import torch
from relevance_finetune import RelevanceRegularizer, attach_gae

model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=64)  # your (pretrained) model
gae = attach_gae(model)                      # records attention maps; gae.remove() undoes it
criterion = RelevanceRegularizer(gae)        # paper defaults: bg 2.0, fg 0.3, relevance 0.8, cls 0.2
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-6, weight_decay=1e-4)
images, masks = torch.randn(2, 3, 64, 64), (torch.rand(2, 64, 64) > 0.5).float()
logits = model(images)                       # your own forward, once
out = criterion(logits, masks)               # out.background, out.foreground, out.classification
out.loss.backward(); optimizer.step(); optimizer.zero_grad()
heat = gae.explain(images)                   # (B, H, W) relevance in [0, 1] for pictures
