"""plca: Pixel-Level Cycle Association (NeurIPS 2020) for domain adaptive semantic segmentation.

The loss is usable on its own::

    from plca import association_loss
    loss = association_loss(source_features, target_features, source_labels, metric="cos")

Importing plca loads torch and numpy only; the commands' packages come with the extras.
"""

from plca.losses.association import AssociationOutput, associate, association_loss, spatial_aggregate
from plca.version import __version__

__all__ = ["AssociationOutput", "associate", "association_loss", "spatial_aggregate", "__version__"]
