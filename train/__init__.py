"""Stage 2: side-adapted networks (IISAN-VS / VA), the SASRec user encoder, the loss and the training loop,
on states loaded from the cache store. Reads the protocol splits from `iisan.data.protocol`."""
