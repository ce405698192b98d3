"""What the tests share and the scripts they run: helpers.py (random configs, model pairs, statistics that make every
term matter, float64 oracles, the error measure), distributed_training.py (one training step per scenario under
torchrun), sm90_compile.py (the kernels compiled for sm_90 as real launches specialise them)."""
