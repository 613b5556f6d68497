"""The slimc IR on top of torch.fx: printing and verification."""
