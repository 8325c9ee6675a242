"""TiDAR: the block-diffusion conversion objective (its token layouts are in ``zaya.layouts``)."""
