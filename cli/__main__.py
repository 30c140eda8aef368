from rids_cli.main import main

main()
