from keyspace.cli.main import main

main()
