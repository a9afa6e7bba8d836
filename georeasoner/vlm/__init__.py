"""The GeoReasoner vision-language model: loader, prompts, answers, SFT sets and fine-tuning."""
