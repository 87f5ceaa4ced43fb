"""Training: the diffusion maths (noise, timesteps, targets), the loss, and the rest of the loop as it arrives."""
