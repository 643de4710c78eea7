"""Stage 2: train side-adapted networks and the user encoder on cached states.

- `config`: TrainConfig and its resolution (defaults < pipeline presets < options).
- `data`: cached states per modality slot (loaded once, standardised), batches.
- `san`: SAN blocks, gates, intra / inter towers, heads, fusion (IISAN-VS / VA).
- `user_encoder`: SASRec.  `loss`: in-batch debiased softmax.  `model`: the recommender and baselines.
- `recipe`: the training loop, early stopping, checkpoints, resume, reports.
"""
