from czb.cli import main

main()
