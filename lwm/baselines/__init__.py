"""Baselines that share lwm's envs, goal vocabulary and goal embeddings, for fair comparison."""
