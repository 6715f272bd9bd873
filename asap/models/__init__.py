"""Protocol models (spec 1, 2): envelope, payloads, entities, ids and enums."""
