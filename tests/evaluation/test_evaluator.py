"""The evaluator's resampling: logits upsampled to the label, then the argmax (mmsegmentation and the
PLCA reference); with test-time aggregation, the aggregated probabilities upsampled (the reference)."""

import torch
import torch.nn.functional as F
from torch import nn

from plca.evaluation.evaluator import evaluate, upsampled_probabilities
from plca.losses.association import spatial_aggregate

# Two pixels of three classes: class 0 clearly first on the left, class 1 on the right, class 2 a
# close second on both sides. Between them, the interpolated logits favour class 2 (the compromise),
# the interpolated probabilities do not.
LOGITS = torch.tensor([[10.0, 0.0, 9.0], [0.0, 10.0, 9.5]]).t().reshape(1, 3, 1, 2)
LABEL_SIZE = (1, 4)


class FixedLogits(nn.Module):
    """Returns the same ``(1, K, h, w)`` logits for every image; features are the logits themselves
    and the classifier is the identity (so that test-time aggregation has something to aggregate)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("fixed", logits)

    def forward(self, images):
        return {"logits": self.fixed.expand(images.shape[0], -1, -1, -1)}

    def extract_features(self, images):
        return self.fixed.expand(images.shape[0], -1, -1, -1)

    def classify(self, features):
        return features


def predictions_of(model, label, **kwargs):
    """Each pixel's predicted class, read from the confusion matrix of one image whose label numbers its pixels."""
    items = [{"image": torch.zeros(3, 8, 16, dtype=torch.uint8), "label": label}]
    matrix = evaluate(model, items, label.numel(), torch.device("cpu"), progress=False, **kwargs).matrix
    rows, columns = matrix.nonzero(as_tuple=True)
    assert matrix.sum() == label.numel() and torch.equal(rows, torch.arange(label.numel()))
    return columns.reshape(label.shape)


def test_evaluation_upsamples_the_logits_then_takes_the_argmax():
    logits_first = F.interpolate(LOGITS, size=LABEL_SIZE, mode="bilinear", align_corners=False).argmax(1)[0]
    probabilities_first = F.interpolate(LOGITS.softmax(1), size=LABEL_SIZE, mode="bilinear",
                                        align_corners=False).argmax(1)[0]
    # bilinear weights (align_corners False) of the two pixels: (1, 0), (3/4, 1/4), (1/4, 3/4), (0, 1)
    assert logits_first.tolist() == [[0, 2, 2, 1]]
    assert probabilities_first.tolist() == [[0, 0, 1, 1]]  # the order matters on the two middle pixels
    # the label numbers the pixels, so the confusion matrix says what each one was predicted; K = 4 >= 3 classes
    model = FixedLogits(torch.cat([LOGITS, torch.full((1, 1, 1, 2), -50.0)], dim=1))
    label = torch.arange(4).reshape(LABEL_SIZE)
    assert predictions_of(model, label).tolist() == [[0, 2, 2, 1]]


def test_test_time_aggregation_upsamples_the_aggregated_probabilities():
    torch.manual_seed(0)
    scores = torch.randn(1, 4, 3, 5) * 3
    label = torch.randint(0, 4, (9, 13))  # any labels: the confusion matrices are compared
    items = [{"image": torch.zeros(3, 8, 16, dtype=torch.uint8), "label": label}]
    model = FixedLogits(scores)
    # the reference: aggregate the features (cos), classify, softmax, aggregate the probabilities (kl),
    # upsample those probabilities, argmax
    probs = spatial_aggregate(spatial_aggregate(scores, "cos", 0.5).softmax(1), "kl", 0.5)
    want = F.interpolate(probs, size=label.shape, mode="bilinear", align_corners=False).argmax(1)[0]
    got = evaluate(model, items, 4, torch.device("cpu"), progress=False, test_time_aggregation=True).matrix
    expected = torch.zeros(4, 4, dtype=got.dtype)
    expected.index_put_((label.flatten(), want.flatten()), torch.ones(label.numel(), dtype=got.dtype), accumulate=True)
    assert torch.equal(got, expected)
    assert torch.allclose(upsampled_probabilities(probs, label.shape, True),
                          F.interpolate(probs, size=label.shape, mode="bilinear", align_corners=False))


def test_upsampled_probabilities_of_logits_are_the_softmax_of_upsampled_logits():
    up = upsampled_probabilities(LOGITS, LABEL_SIZE, test_time_aggregation=False)
    want = F.interpolate(LOGITS, size=LABEL_SIZE, mode="bilinear", align_corners=False).softmax(1)
    assert torch.allclose(up, want) and torch.allclose(up.sum(1), torch.ones(1, *LABEL_SIZE))
