"""Skills shipped with asap. ``uvicorn asap.server:app`` serves every module of this package."""
