"""Stage 2: train side-adapted networks and the user encoder on cached states.

- `config`: TrainConfig and its resolution (defaults < method presets < pipeline presets < options).
- `methods`: the registry of training methods (presets, item source, tuning, how the item encoder is built).
- `data`: cached states per modality slot (loaded once, standardised), batches.
- `san`: SAN blocks, gates, intra / inter towers, heads, fusion (IISAN-VS / VA).
- `user_encoder`: SASRec.  `loss`: in-batch debiased softmax.  `model`: the recommender and the cached / ID
  item encoders.  `end_to_end` / `tuning`: item encoders that run the backbones, and how they train.
- `step`: the one training step.  `recipe`: the training loop, early stopping, checkpoints, resume, reports.
"""
