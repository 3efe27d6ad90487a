"""Row counts read from the dump stream: exact however the stream is cut, or honestly given up."""

from __future__ import annotations

import random

import pytest

from drivers.mysql.rowcount import LINE_HEAD, RowCounter

DUMP = b"""-- MariaDB dump 10.19  Distrib 10.11.19-MariaDB, for debian-linux-gnu (x86_64)
--
-- Host: localhost    Database: shop
-- ------------------------------------------------------
/*!40101 SET NAMES utf8mb4 */;

--
-- Current Database: `shop`
--

CREATE DATABASE /*!32312 IF NOT EXISTS*/ `shop` /*!40100 DEFAULT CHARACTER SET latin1 */;

USE `shop`;

--
-- Table structure for table `empty`
--

DROP TABLE IF EXISTS `empty`;
CREATE TABLE `empty` (
  `id` int(11) NOT NULL,
  PRIMARY KEY (`id`)
) ENGINE=InnoDB DEFAULT CHARSET=latin1;

--
-- Dumping data for table `empty`
--

LOCK TABLES `empty` WRITE;
/*!40000 ALTER TABLE `empty` DISABLE KEYS */;
/*!40000 ALTER TABLE `empty` ENABLE KEYS */;
UNLOCK TABLES;

--
-- Table structure for table `we``ird`
--

DROP TABLE IF EXISTS `we``ird`;
CREATE TABLE `we``ird` (
  `id` int(11) NOT NULL,
  `note` varchar(64) DEFAULT NULL COMMENT 'a;\\nb',
  PRIMARY KEY (`id`)
) ENGINE=InnoDB DEFAULT CHARSET=latin1;

--
-- Dumping data for table `we``ird`
--

LOCK TABLES `we``ird` WRITE;
/*!40000 ALTER TABLE `we``ird` DISABLE KEYS */;
INSERT INTO `we``ird` VALUES
(1,'),(2,\\'x\\'),('),
(2,'a;\\n(3,\\'fake\\');\\n-- Dumping data for table `empty`'),
(3,NULL),
(4,'\\\\'),
(5,'DELIMITER ;;');
INSERT INTO `we``ird` VALUES
(6,'second statement');
/*!40000 ALTER TABLE `we``ird` ENABLE KEYS */;
UNLOCK TABLES;
/*!50003 SET @saved_cs_client      = @@character_set_client */ ;
DELIMITER ;;
/*!50003 CREATE*/ /*!50017 DEFINER=`root`@`localhost`*/ /*!50003 TRIGGER t_ai AFTER INSERT ON `we``ird` FOR EACH ROW
BEGIN
-- Dumping data for table `empty`
INSERT INTO `empty` VALUES
(NEW.id);
END */;;
DELIMITER ;

--
-- Temporary table structure for view `v`
--

SET @saved_cs_client     = @@character_set_client;
/*!50001 CREATE VIEW `v` AS SELECT
 1 AS `id` */;

--
-- Table structure for table `seq`
--

CREATE SEQUENCE `seq` start with 1 minvalue 1 maxvalue 9223372036854775806 increment by 1 cache 1000 nocycle ENGINE=InnoDB;

--
-- Dumping data for table `seq`
--

SELECT SETVAL(`seq`, 1, 0);

--
-- Current Database: `other`
--

--
-- Table structure for table `empty`
--

CREATE TABLE `empty` (
  `id` int(11) NOT NULL
) ENGINE=InnoDB;

--
-- Dumping data for table `empty`
--

INSERT INTO `empty` VALUES
(7);

--
-- Dumping routines for database 'other'
--
DELIMITER ;;
CREATE PROCEDURE `p`()
BEGIN
INSERT INTO `empty` VALUES
(8),
(9);
END ;;
DELIMITER ;

-- Dump completed on 2026-12-01  6:30:43
"""
EXPECTED = {"shop.empty": 0, "shop.we`ird": 6, "other.empty": 1}


def feed_in_pieces(data: bytes, cuts: list[int]) -> RowCounter:
    counter = RowCounter()
    start = 0
    for cut in sorted(cuts) + [len(data)]:
        counter.feed(data[start:cut])
        start = cut
    counter.finish()
    return counter


def test_counts_only_the_dump_data_sections() -> None:
    counter = feed_in_pieces(DUMP, [])
    assert counter.exact, counter.why
    assert counter.counts == EXPECTED


def test_counts_do_not_depend_on_where_the_stream_is_cut() -> None:
    for cut in range(1, len(DUMP)):
        assert feed_in_pieces(DUMP, [cut]).counts == EXPECTED, cut
    rng = random.Random(4)
    for _ in range(300):
        counter = feed_in_pieces(DUMP, rng.sample(range(1, len(DUMP)), rng.randint(2, 40)))
        assert counter.exact and counter.counts == EXPECTED
    one_byte = RowCounter()
    for i in range(len(DUMP)):
        one_byte.feed(DUMP[i:i + 1])
    assert one_byte.counts == EXPECTED


def test_rows_sharing_a_line_give_up_and_say_why() -> None:
    reasons: list[str] = []
    counter = RowCounter(on_inexact=reasons.append)
    counter.feed(b"-- Current Database: `d`\n-- Table structure for table `t`\nCREATE TABLE `t` (\n) ;\n"
                 b"-- Dumping data for table `t`\nINSERT INTO `t` VALUES (1,'a'),(2,'),(');\n")
    assert not counter.exact
    assert reasons == ["the rows of d.t share a line (not one row per line)"]
    counter.feed(b"anything after is ignored\n")
    assert reasons == [counter.why]


def test_a_huge_line_in_a_data_section_gives_up_without_buffering_it() -> None:
    counter = RowCounter()
    counter.feed(b"-- Current Database: `d`\n-- Dumping data for table `t`\nINSERT INTO `t` VALUES (1,'")
    for _ in range(4):
        counter.feed(b"x" * LINE_HEAD)
    assert len(counter._head) <= LINE_HEAD
    counter.feed(b"');\n")
    assert not counter.exact


def test_a_dump_cut_inside_a_value_list_is_not_exact() -> None:
    counter = RowCounter()
    counter.feed(DUMP[:DUMP.index(b"(3,NULL)")])
    counter.finish()
    assert not counter.exact and "ended inside the data of shop.we`ird" in counter.why


@pytest.mark.parametrize("rows", [1, 2, 1000])
def test_many_rows_in_one_statement(rows: int) -> None:
    body = b",\n".join(b"(%d,'r),(\\'%d\\')')" % (i, i) for i in range(rows))
    data = b"-- Current Database: `d`\n-- Dumping data for table `t`\nINSERT INTO `t` VALUES\n" + body + b";\n"
    counter = feed_in_pieces(data, list(range(7, len(data), 4093)))
    assert counter.exact and counter.counts == {"d.t": rows}
