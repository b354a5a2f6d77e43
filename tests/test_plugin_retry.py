"""A plugin that registers something and then fails: a second load in the same process repeats the
plugin's own error, not a "registered twice" that would hide it."""

from __future__ import annotations

import pytest

import plca.plugins as plugins
from plca.models.registry import is_known_backbone, unregister_backbone
from plca.plugins import PluginError, load_plugins

HALF_PLUGIN = '''
from torch import nn
from plca.models.registry import IMAGENET_RGB, BackboneContract, register_backbone


@register_backbone("half_registered_net", contract=BackboneContract(family="test", normalization=IMAGENET_RGB))
class HalfNet(nn.Module):
    pass


raise RuntimeError("the second half of the plugin is broken")
'''


def test_a_retried_load_repeats_the_plugins_own_error(tmp_path, monkeypatch):
    (tmp_path / "half_plugin.py").write_text(HALF_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv(plugins.ENV_VAR, "half_plugin")
    monkeypatch.setattr(plugins, "_LOADED", None)
    monkeypatch.setattr(plugins, "_FAILURE", None)
    monkeypatch.setattr(plugins, "installed_entry_points", lambda: [])
    try:
        messages = []
        for _ in range(2):
            with pytest.raises(PluginError) as caught:
                load_plugins()
            messages.append(str(caught.value))
        assert is_known_backbone("half_registered_net")  # the first half did register
        assert messages[0] == messages[1]
        assert "the second half of the plugin is broken" in messages[1] and "twice" not in messages[1]
    finally:
        if is_known_backbone("half_registered_net"):
            unregister_backbone("half_registered_net")
