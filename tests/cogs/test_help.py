"""/help links the operator's policies only when they are configured."""

from __future__ import annotations

from cogs.help import help_embed


def test_policy_links_appear_when_configured():
    embed = help_embed("caption", 2, "https://example.org/privacy", None)
    fields = {field.name: field.value for field in embed.fields}
    assert fields["About"] == "[Privacy policy](https://example.org/privacy)"
    assert len(embed) < 6000


def test_no_about_section_without_links():
    assert "About" not in {field.name for field in help_embed("vqa", 2, None, None).fields}
