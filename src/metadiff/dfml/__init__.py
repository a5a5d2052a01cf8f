"""Data-free meta-learning (spec mlwdudm.md): pseudo data from a diffusion zoo guided by a class-learner."""
