"""Dispatch: labelling and fine-tuning as Dask tasks, on a local cluster or a real one."""
