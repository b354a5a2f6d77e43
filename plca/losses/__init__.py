"""Loss functions: pure functions of tensors, shapes in their docstrings."""

from plca.losses.association import AssociationOutput, associate, association_loss, spatial_aggregate
from plca.losses.lovasz import lovasz_softmax, lovasz_softmax_global, lovasz_softmax_reference_ddp
from plca.losses.lsr import lsr_loss

__all__ = ["AssociationOutput", "associate", "association_loss", "lovasz_softmax", "lovasz_softmax_global",
           "lovasz_softmax_reference_ddp", "lsr_loss", "spatial_aggregate"]
