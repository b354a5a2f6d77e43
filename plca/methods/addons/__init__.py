"""Building blocks of DAFormer-style self-training, each a small pure module.

EMA teacher (:mod:`.ema`), pseudo-labels (:mod:`.pseudo_labels`), ClassMix (:mod:`.classmix`),
DACS' strong augmentation (:mod:`.strong_augment`), MIC's patch masking (:mod:`.masking`) and the
thing-class ImageNet feature distance (:mod:`.feature_distance`), HRDA's losses and views of a
multi-resolution output (:mod:`.multi_resolution`). Rare Class Sampling lives on
the data side, in :mod:`plca.data.rare_class`.
"""

from plca.methods.addons.classmix import class_mix, class_mix_masks, mix
from plca.methods.addons.ema import EMATeacher, ema_alpha
from plca.methods.addons.feature_distance import (THING_CLASSES, downscale_labels, feature_distance_loss,
                                                  thing_class_indices, thing_mask)
from plca.methods.addons.masking import mask_images, normalized_zero, patch_mask
from plca.methods.addons.multi_resolution import detail_view, is_multi_resolution, multi_resolution_loss
from plca.methods.addons.pseudo_labels import pseudo_label_accuracy, pseudo_labels
from plca.methods.addons.strong_augment import (blur_kernel_size, color_jitter, gaussian_blur, rgb_to_hsv,
                                                hsv_to_rgb, strong_augment)

__all__ = ["EMATeacher", "THING_CLASSES", "blur_kernel_size", "class_mix", "class_mix_masks", "color_jitter",
           "detail_view", "downscale_labels", "ema_alpha", "is_multi_resolution", "feature_distance_loss", "gaussian_blur", "hsv_to_rgb", "mask_images",
           "mix", "multi_resolution_loss", "normalized_zero", "patch_mask", "pseudo_label_accuracy", "pseudo_labels", "rgb_to_hsv",
           "strong_augment", "thing_class_indices", "thing_mask"]
