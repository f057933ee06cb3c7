"""BlockDrop: dynamic inference paths in residual networks (Wu et al., CVPR 2018)."""
