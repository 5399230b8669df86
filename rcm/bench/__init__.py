"""`rcm bench`: attention kernels (attention.py), the rCM training step (step.py) and few-step sampling
(sample.py) of a Wan DiT; common.py holds their shared shapes, FLOP counts and device helpers."""
