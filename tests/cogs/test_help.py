"""/help links the operator's policies only when they are configured."""

from __future__ import annotations

from cogs.help import help_embed
from core.config import PrivacySettings
from core.guild_settings import GuildSettings

PRIVACY = PrivacySettings(request_retention_hours=48)


def test_policy_links_appear_when_configured():
    embed = help_embed("caption", 2, GuildSettings(), PRIVACY, "https://example.org/privacy", None)
    fields = {field.name: field.value for field in embed.fields}
    assert fields["About"] == "[Privacy policy](https://example.org/privacy)"
    assert fields["Your data"].startswith("Each answer's picture and prompt are kept up to 2 days, for its buttons.")
    assert len(embed) < 6000


def test_direct_messages_get_no_server_section():
    fields = {field.name: field.value for field in help_embed("caption", 2, None, PRIVACY, None, None).fields}
    assert "This server" not in fields
    assert fields["Ask"].startswith("`/comprehend image:<your picture>` describes it with the task **caption**.")


def test_no_about_section_without_links():
    assert "About" not in {field.name for field in help_embed("vqa", 2, GuildSettings(), PRIVACY, None, None).fields}


def test_the_servers_settings_are_summarised():
    rules = GuildSettings(answer_channels=frozenset({5}), required_role=9, ephemeral_answers=True)
    fields = {field.name: field.value for field in help_embed("cats", 3, rules, PRIVACY, None, None).fields}
    assert fields["This server"] == (
        "Default task: **cats** · 3 tasks · answers only in <#5> · for members with <@&9> · answers are private"
    )
