"""The keyspace command line. Parsing and printing only; the stages hold the logic."""
