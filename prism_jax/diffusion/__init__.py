"""Diffusion backbone (SPEC section 11): DiT, the Stable Diffusion VAE, the diffusion process and DDIM."""
