"""plca: Pixel-Level Cycle Association (NeurIPS 2020) for domain adaptive semantic segmentation.

The loss is usable on its own::

    from plca import association_loss
    loss = association_loss(source_features, target_features, source_labels, metric="cos")
"""

from plca.losses.association import AssociationOutput, associate, association_loss, spatial_aggregate

__version__ = "0.1.0"
__all__ = ["AssociationOutput", "associate", "association_loss", "spatial_aggregate", "__version__"]
