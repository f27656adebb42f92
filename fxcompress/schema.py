"""JSON Schema of the recipe format, including every registered pass's options (for editors)."""
from __future__ import annotations

from .recipe import RecipeHeader
from .registry import available_passes


def recipe_schema() -> dict:
    """Draft 2020-12 schema: the recipe header, and `passes` items as a name or a one-key mapping."""
    schema = RecipeHeader.model_json_schema()
    defs = schema.setdefault("$defs", {})
    choices = []
    names = []
    for name, info in available_passes().items():
        names.append(name)
        config = info.config.model_json_schema(ref_template="#/$defs/{model}")
        defs.update(config.pop("$defs", {}))
        key = f"pass_{name}"
        defs[key] = config
        choices.append({"type": "object", "properties": {name: {"anyOf": [{"$ref": f"#/$defs/{key}"},
                                                                          {"type": "null"}]}},
                        "required": [name], "additionalProperties": False})
    schema["properties"]["passes"] = {"type": "array", "minItems": 1,
                                      "items": {"anyOf": [{"type": "string", "enum": names}, *choices]}}
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "fxcompress recipe"
    return schema
