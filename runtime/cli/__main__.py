from hmoe.runtime.cli import main

main()
