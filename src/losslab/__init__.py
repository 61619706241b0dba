"""losslab: train GPT language models with pluggable next-token loss implementations."""
