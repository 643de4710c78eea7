"""Full-ranking HR@K / NDCG@K evaluation, efficiency measurement (time, peak memory, parameters, TPME),
reports and plots."""
