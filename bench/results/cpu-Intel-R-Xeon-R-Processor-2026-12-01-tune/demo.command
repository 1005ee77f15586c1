build/moegen tune specs/demo.yaml --tokens 1,16,128,1024 --budget 150 --out tuning
