"""The argument every Aaren config takes: "ATTENTION[,CHOICE][,local]".

ATTENTION is "softmax" (the Transformer baseline) or "aaren" and sets
config.model.attention, the only difference between the two models; CHOICE is
the config's one optional pick (a dataset, an environment), `local` its CPU
setting.
"""

ATTENTIONS = ("softmax", "aaren")


def parse_arg(arg: str, config_name: str, choice: str | None):
  """arg -> (attention, the CHOICE given or None, local); an error names the config and the argument.

  choice: what the CHOICE is called in messages ("DATASET", "ENV"); None: the config takes none.
  """
  usage = f"ATTENTION{f'[,{choice}]' if choice else ''}[,local]"
  parts = [p for p in arg.split(",") if p]
  if not parts or parts[0] not in ATTENTIONS:
    raise ValueError(f"{config_name} takes '{usage}' with ATTENTION one of {ATTENTIONS}, got {arg!r}")
  attention, rest = parts[0], parts[1:]
  picks = [p for p in rest if p != "local"]
  if len(picks) > (1 if choice else 0):
    raise ValueError(f"{config_name} takes '{usage}'; {picks} in {arg!r} is too many")
  return attention, (picks[0] if picks else None), "local" in rest
