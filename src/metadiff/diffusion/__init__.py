"""One diffusion toolkit for latents and images: schedules, samplers, guidance, and the image zoo."""
