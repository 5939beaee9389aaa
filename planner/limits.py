"""How long a sequence a model can take: the hard cap on tokens per sequence, and the soft limit past which a
warning is due. Pure arithmetic on `ModelArch.max_position_embeddings` (config.json); no torch.

The hard cap is 4 x `max_position_embeddings`. Between 1x and 4x a RoPE model (every family ftplan models) still
runs: positions it did not see in pre-training, or a context extended with `rope_scaling` (Qwen2.5's YaRN factor 4
is documented to reach 4x its config's limit), so that is a warning. Beyond 4x no published scaling of these
families is trained, and a memory estimate of such a run would describe something that cannot be useful. A config
without a limit is capped at 2^20 tokens. Prefix and prompt tuning's virtual tokens take positions ahead of the
sequence, so they count too, and on their own they may not exceed the limit itself.
"""

from __future__ import annotations

POSITION_CAP_FACTOR = 4
UNKNOWN_LIMIT_CAP = 1 << 20


def position_limit(arch) -> int:
    """The model's `max_position_embeddings` (0: the config does not say)."""
    return int(getattr(arch, "max_position_embeddings", 0) or 0)


def position_cap(arch) -> int:
    """The most positions (sequence + virtual tokens) accepted for `arch`: 4 x its limit, or 2^20 without one."""
    limit = position_limit(arch)
    return POSITION_CAP_FACTOR * limit if limit > 0 else UNKNOWN_LIMIT_CAP


def virtual_tokens(tc) -> int:
    """Positions the method adds ahead of every sequence (prefix and prompt tuning's virtual tokens)."""
    return tc.num_virtual_tokens if tc.spec.uses_virtual_tokens else 0


def position_error(arch, tc) -> tuple[str, str] | None:
    """(TrainConfig field, message) when `tc` cannot work on `arch`'s positions, else None."""
    limit = position_limit(arch)
    virtual = virtual_tokens(tc)
    if virtual and limit and virtual > limit:
        return "num_virtual_tokens", (
            f"{virtual} virtual tokens: at most {limit} for {arch.name} (its max_position_embeddings; the virtual "
            "tokens take positions ahead of every sequence; typical values are 8 to 100)")
    cap = position_cap(arch)
    if tc.seq_len + virtual > cap:
        plus = f" (+ {virtual} virtual tokens)" if virtual else ""
        why = (f"{POSITION_CAP_FACTOR} x max_position_embeddings {limit}" if limit
               else "the config gives no max_position_embeddings")
        return "seq_len", (f"seq_len {tc.seq_len}{plus}: at most {cap - virtual} tokens per sequence for "
                           f"{arch.name} ({why}; beyond that positions cannot work)")
    return None


def position_warning(arch, tc) -> str | None:
    """A warning when `tc` uses positions past `arch`'s limit (but within the cap), else None."""
    limit = position_limit(arch)
    virtual = virtual_tokens(tc)
    if limit and tc.seq_len + virtual > limit:
        plus = f" + {virtual} virtual tokens" if virtual else ""
        return (f"seq_len {tc.seq_len}{plus} is beyond {arch.name}'s position limit (max_position_embeddings "
                f"{limit}): positions past it were not pre-trained; extend the context with rope_scaling in "
                "config.json, or lower it")
    return None
