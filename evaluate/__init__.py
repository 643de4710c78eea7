"""What measures, and nothing that trains: full-ranking HR@K / NDCG@K (`metrics`), efficiency primitives
(memory readings, projections, TPME: `efficiency`) and report writing (`report`). The runners that train
and measure (the bench) are in experiments/."""
