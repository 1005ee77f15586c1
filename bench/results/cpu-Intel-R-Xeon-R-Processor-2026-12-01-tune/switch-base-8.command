build/moegen tune specs/switch-base-8.yaml --tokens 1,16,128,1024 --budget 150 --out tuning
