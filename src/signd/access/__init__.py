"""Who is asking (from the kernel) and what they may do: principals, rules, rate limits."""
