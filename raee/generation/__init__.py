"""Text generation with early exits: decoding loop, exit methods, fine-tuning and self-speculative decoding."""
