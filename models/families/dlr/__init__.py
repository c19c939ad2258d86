"""DLR_LH and DLR_BM (Lu et al., QIMS 2025): ResNet-50 ROI classifier with an age MLP, and the BI-RADS 4A
co-decision.
"""
