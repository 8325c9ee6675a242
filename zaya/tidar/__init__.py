"""TiDAR: the block-diffusion conversion objective and its token layouts."""
