"""Weights from and for other frameworks: PyTorch `.pth` files (`pth`) and the official
PatchConvNet `state_dict` (`patch_convnet`)."""
