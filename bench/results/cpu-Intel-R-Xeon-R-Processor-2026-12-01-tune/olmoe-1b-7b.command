build/moegen tune specs/olmoe-1b-7b.yaml --tokens 1,16,128,1024 --budget 300 --out tuning
