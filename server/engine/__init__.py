"""The serving engine: scheduler, KV block pool, model runner, sampler, detokenizer, async front."""
