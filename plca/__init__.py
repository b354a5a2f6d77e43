"""plca: Pixel-Level Cycle Association (NeurIPS 2020) for domain adaptive semantic segmentation.

The loss is usable on its own::

    from plca import association_loss
    loss = association_loss(source_features, target_features, source_labels, metric="cos")

and a trained model segments images in two lines::

    model = plca.load_model("runs/<run_name>")   # a run, a checkpoint, an export or a model folder
    labels = plca.segment(model, image)           # (H, W) class ids; model.classes names them

Importing plca loads torch and numpy only; the commands' packages come with the extras.
"""

from plca.api import SegmentationModel, load_model, segment
from plca.losses.association import AssociationOutput, associate, association_loss, spatial_aggregate
from plca.version import __version__
__all__ = ["AssociationOutput", "SegmentationModel", "associate", "association_loss", "load_model", "segment",
           "spatial_aggregate", "__version__"]
