"""Stage 1: run a frozen backbone once per item and write one pooled vector per selected layer into the
cache store (`iisan.cache_store`). Lands with the extraction issue; the data layer (`iisan.data`) and the
cache writer it uses are in place."""
