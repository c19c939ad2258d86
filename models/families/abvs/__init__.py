"""ABVS three-plane family (Liu et al., Theranostics 2025): one ResNet per plane, fused; per-frame averaging.

The shipped model (ResNet-18 trunks at half width) was trained on volumes built from 2-D lesions, not ABVS data:
:mod:`.recipe`, :mod:`.card`, ``models/training/train_abvs_three_plane.py``.
"""
